"""A reward whose values are scripted by the test (one value per call), for evaluation-during-training tests
that need a known sequence of eval scores."""

import torch


class ScriptedReward:
    values = []      # set by the test; each call consumes one value per image

    def __init__(self, label: str = "scripted"):
        self.label = label

    def __call__(self, images, prompts, metadata):
        return torch.tensor([ScriptedReward.values.pop(0) for _ in range(images.shape[0])])


class FailingReward:
    """A training reward that always raises: a resume with it fails before completing a step."""

    def __init__(self, label: str = "failing"):
        self.label = label

    def __call__(self, images, prompts, metadata):
        raise RuntimeError("scripted reward failure")
