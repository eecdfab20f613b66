"""Tiny random models of the evaluators' architectures (Mask2Former, CLIP, BLIP VQA), saved to a directory and
loaded back by path like real weights. Nothing is downloaded."""

import torch

from tests.rewards._tiny import PUNCT, WORDS, bert_tokenizer

COLOUR_WORDS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "colored",
                "object", "dog", "cat", "car", "person"]


def clip_tokenizer():
    """Word-level tokenizer that wraps every text in <s> ... </s> (CLIP pools at the end-of-text token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + WORDS + COLOUR_WORDS + PUNCT))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                        special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_clip(directory, seed=0, image_size=28) -> str:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=24, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=14), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def save_tiny_mask2former(directory, seed=0, num_labels=80) -> str:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=64, num_queries=12, num_labels=num_labels,
                               use_pretrained_backbone=False)
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(str(directory))
    return str(directory)


def save_tiny_blip_vqa(directory, seed=0) -> str:
    """BLIP VQA with the original tokenizer's order: BERT vocabulary, then [DEC] (bos), then [ENC]."""
    import os

    from transformers import BlipConfig, BlipForQuestionAnswering

    os.makedirs(str(directory), exist_ok=True)
    tokenizer = bert_tokenizer(str(directory))
    vocab = len(tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=vocab + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab,
                         sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                         encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16))
    torch.manual_seed(seed)
    BlipForQuestionAnswering(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)
