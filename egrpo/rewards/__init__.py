"""Reward adapters, each registering itself in `egrpo.rewards.registry.REWARDS` when this package is imported.

=======================  =====================================================  ================================
name                     what                                                   needs
=======================  =====================================================  ================================
``colour``               pixel colour rule (built into egrpo.rewards.registry) nothing
``jpeg_compressibility`` -JPEG size in kB                                       Pillow
``ocr``                  edit-distance OCR reward on quoted prompt text         rapidocr-onnxruntime (ships models)
``geneval``              Flow-GRPO's GenEval reward (STAGE)                     Mask2Former + CLIP weights (local)
``geneval_graded``       our graded GenEval rule on open-vocabulary detections  GroundingDINO weights (local)
``grounding_dino``       T2I-R1 object/spatial/counting reward (``_strict``)    GroundingDINO weights (local)
``git_vqa``              GIT VQA p(yes) per attribute noun                       GIT weights (local)
``orm``                  LLaVA-OneVision yes/no outcome reward                  LLaVA-OneVision weights (local)
``clip_score``           PickScore-style CLIP score                             CLIP weights (local)
``hps``                  HPS v2.1 (open_clip checkpoint -> transformers CLIP)   HPS checkpoint + CLIP tokenizer
=======================  =====================================================  ================================

Every module is imported on its own: one whose dependency is missing is recorded in `UNAVAILABLE` (the
others still register) and its constructor is never reached; naming it in a config then fails with the
missing package in the message (see `egrpo.rewards.base.require`, which the adapters also call when built).
"""

import importlib
import logging

from egrpo.rewards.registry import (REWARDS, RewardSet, build_rewards, check_reward_arguments,  # noqa: F401
                                    register_reward, resolve_reward)

log = logging.getLogger(__name__)

ADAPTERS = {
    "compressibility": ("jpeg_compressibility",),
    "ocr": ("ocr",),
    "geneval": ("geneval", "geneval_graded"),
    "grounding_dino": ("grounding_dino", "grounding_dino_strict"),
    "git_vqa": ("git_vqa",),
    "orm": ("orm",),
    "clip_score": ("clip_score",),
    "hps": ("hps",),
}
UNAVAILABLE = {}


def _missing(name: str, error: Exception):
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise ImportError(f"reward {name!r} is unavailable: {error}")

    Unavailable.__name__ = f"Unavailable_{name}"
    return Unavailable


for _module, _names in ADAPTERS.items():
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ImportError as _e:   # an optional dependency of that adapter only
        UNAVAILABLE[_module] = str(_e)
        log.debug("reward module %s unavailable: %s", _module, _e)
        for _name in _names:
            if _name not in REWARDS:
                register_reward(_name)(_missing(_name, _e))
