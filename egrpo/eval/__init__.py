"""Benchmarks without their original environments: GenEval, T2I-CompBench (the categories transformers models
allow), preference scores (HPS v2.1, PickScore, CLIPScore, aesthetic, ImageReward), STAGE's OCR accuracy, WISE
(external judge), and evaluation during training.

One module per evaluator (`geneval`, `compbench`, `prefs`, `ocr`, `wise`), shared file handling in `io`
(resumable per-image results, summaries) and `generation` (writing the images in each benchmark's layout),
the ``egrpo eval`` command in `cli`, the trainer's hook in `training`. See docs/evaluation.md.
"""
