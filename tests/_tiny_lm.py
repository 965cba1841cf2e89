"""Tiny real-architecture LLaVA checkpoints with a tokenizer and a chat template.

Why a word-level tokenizer built here: no hub is reachable; a `tokenizers` WordLevel model
with a `<s> $A` template is a real fast tokenizer that `AutoTokenizer`, `LlavaProcessor`
and the runtime's `tokenizers` all load, and its ids are easy to read in a failing test.
Random weights: token-id parity, never accuracy claims.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = 199
WORDS = ("a b c d e f g h i j k l m n o p q r s t u v w x y z what is in this picture the cat dog on of and "
         "USER ASSISTANT : ? . , describe image photo color red blue green answer yes no").split()
# A processor-style template (typed content parts), the shape llava-hf repos ship.
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save_tokenizer(folder: Path, vocab_size: int = 200, template: str | None = TEMPLATE) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    for i in range(len(vocab), IMAGE_TOKEN):
        vocab[f"w{i}"] = i
    vocab["<image>"] = IMAGE_TOKEN
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<image>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(folder)


def save_tiny_llava(folder: Path, text: str = "llama", layers: int = 2, template: str | None = TEMPLATE) -> Path:
    """A LLaVA (CLIP tower 32 px, patch 8 → 16 image tokens) over a 2-layer Llama/Mistral/Qwen2
    with grouped-query attention, plus tokenizer and processor with a chat template."""
    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, MistralConfig, Qwen2Config)

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text]
    text_config = text_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=200, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text_config.to_dict(), image_token_index=IMAGE_TOKEN,
                         image_seq_length=16)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # larger logit margins than the default init: greedy ties are rarer
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    save_tokenizer(folder, template=template)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image_processor.save_pretrained(folder)
    if template is not None:
        LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder), patch_size=8,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=template).save_pretrained(folder)
    return folder


QWEN_SPECIALS = {"<|im_start|>": 195, "<|im_end|>": 196, "<|vision_start|>": 197, "<|vision_end|>": 198, "<|image_pad|>": 199}
# Qwen2-VL's template, shortened: typed parts, one vision_start/image_pad/vision_end per image.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen2_vl(folder: Path, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> Path:
    """A Qwen2-VL (2-layer tower, merge 2) over a 2-layer GQA text model with M-RoPE, plus a
    word-level tokenizer with Qwen's special tokens and a processor chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, hidden_size=64),
        text_config=dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=196,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         tie_word_embeddings=False),
        image_token_id=199, video_token_id=194, vision_start_token_id=197, vision_end_token_id=198, tie_word_embeddings=False)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = 196
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    words = ["<unk>", "user", "assistant"] + list(dict.fromkeys(WORDS))
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(vocab), 200):
        vocab.setdefault(f"w{i}", i)
    vocab = {w: i for w, i in vocab.items() if i not in QWEN_SPECIALS.values() and i != 194} | QWEN_SPECIALS | {"<|video_pad|>": 194}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(["<unk>", *QWEN_SPECIALS, "<|video_pad|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>",
                            chat_template=QWEN_TEMPLATE).save_pretrained(folder)
    # No Qwen2VLProcessor: it needs a video processor (torchvision); the template lives with the tokenizer
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(folder)
    return folder
