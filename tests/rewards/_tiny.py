"""Tiny random reward models of the real architectures, saved to a directory and loaded back by path.

Nothing here is downloaded: tokenizers are built from small word lists, configs are shrunk to a few
hundred thousand parameters so that a forward pass takes milliseconds on a CPU.
"""

import os

import torch

WORDS = ["a", "an", "the", "red", "blue", "green", "yellow", "cat", "dog", "car", "apple", "ball", "left", "right",
         "of", "on", "above", "below", "two", "three", "photo", "yes", "no", "is", "there", "does", "this", "image",
         "accurately", "represent", "prompt", "generated", "by", "please", "answer", "or", "without", "explanation",
         "user", "assistant", "system", "you", "are", "helpful", "and", "in"]
PUNCT = [".", ",", "?", ":", "!", "'", "-"]


def bert_vocab_file(directory) -> str:
    path = os.path.join(directory, "vocab.txt")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PUNCT + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    with open(path, "w") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


def bert_tokenizer(directory):
    from transformers import BertTokenizerFast

    with open(bert_vocab_file(directory)) as f:
        vocab = {line.strip(): i for i, line in enumerate(f)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def word_level_tokenizer(extra_special=(), bos="<s>", eos="</s>", pad="<pad>"):
    """A whitespace/punctuation word-level fast tokenizer with the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = [pad, "<unk>", bos, eos, *extra_special]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + WORDS + PUNCT + list("abcdefghijklmnopqrstuvwxyz0123456789")))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token="<unk>", additional_special_tokens=list(extra_special))


def save_tiny_grounding_dino(directory, seed=0) -> str:
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tokenizer = bert_tokenizer(directory)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
                                 decoder_attention_heads=2, num_queries=30, num_feature_levels=4, max_text_len=32,
                                 encoder_n_points=2, decoder_n_points=2, use_pretrained_backbone=False)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(directory)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(directory)
    return directory


def save_tiny_git(directory, seed=0) -> str:
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = bert_tokenizer(directory)
    config = GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GitForCausalLM(config).eval().save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_llava_onevision(directory, seed=0) -> str:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor)

    tokenizer = word_level_tokenizer(extra_special=("<image>", "<video>", "<|im_start|>", "<|im_end|>"),
                                     bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, tie_word_embeddings=False),
        image_token_id=image_token, video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(directory)
    image_processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]])
    # Tokenizer and image processor saved separately: LlavaOnevisionProcessor also wants a video processor,
    # which needs torchvision. The adapter loads the two with AutoTokenizer / AutoImageProcessor.
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return directory
