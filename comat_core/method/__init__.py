"""CoMat itself: the differentiable sampler, attention capture, the three losses, the discriminator, the trainer."""
