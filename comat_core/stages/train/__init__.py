"""The ``train`` stage: its inputs (``inputs``), the stage function (``stage``) and the multi-process launcher (``launch``)."""
