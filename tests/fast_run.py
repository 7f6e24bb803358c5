"""The smallest real tiny run, shared by the tests that run whole pipelines: 4 prompts, 2 per shard,
two training steps checkpointed after each, one evaluation prompt."""

FAST = [
    "prompts.max_prompts=4",
    "gan_gt.shard_size=2", "gan_gt.num_inference_steps=2", "gan_gt.preview_images=2",
    "masks.shard_size=2",
    "train.max_steps=2", "train.num_inference_steps=2", "train.grad_steps=1", "train.losses.attribute_steps=1",
    "train.checkpoint_every=1", "train.validation_every=2",
    "evaluate.categories=[color]", "evaluate.prompts_per_category=1", "evaluate.images_per_prompt=1",
    "evaluate.num_inference_steps=2", "evaluate.bootstrap_samples=10", "evaluate.grid_prompts=1",
]
