"""Tiny, fully local diffusers pipeline folders for tests (no hub access).

``build_tiny_sd3(folder)`` writes a ``StableDiffusion3Pipeline`` and ``build_tiny_longcat(folder)`` a
``LongCatImagePipeline``; both load with ``DiffusionPipeline.from_pretrained(folder)`` and generate on CPU
in a few seconds. Every weight is random (seeded), every tokenizer is built here from an in-code vocabulary.
The shapes mirror the real models where it matters to adapters (16 latent channels, VAE factor 8, patch 2,
CLIP 77 + T5 256 text tokens for SD3, 512 text tokens for LongCat); only widths and depths are tiny.

The configs are module constants so tests and notes can refer to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP / Qwen byte-level alphabet: byte value -> printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_CHARS: list[str] = list(_bytes_to_unicode().values())  # 256 symbols, one per byte

# AutoencoderKL: 4 blocks -> vae_scale_factor 8 (as SD3 / FLUX VAEs), 16 latent channels, no quant convs.
_VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 8, 8],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=64,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Latent statistics of the real checkpoints (stabilityai/stable-diffusion-3-medium-diffusers vae/config.json and
# the FLUX.1 VAE that LongCat-Image reuses).
SD3_VAE_CONFIG = dict(_VAE_COMMON, scaling_factor=1.5305, shift_factor=0.0609)
LONGCAT_VAE_CONFIG = dict(_VAE_COMMON, scaling_factor=0.3611, shift_factor=0.1159)


def _vae(config: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config).eval()


def _folder(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------------------------
# SD3
# --------------------------------------------------------------------------------------------------------------

# CLIP-L role: hidden 32 / projection 32; CLIP-G role: hidden 64 / projection 64.
# pooled = cat(32, 64) = 96 = transformer.pooled_projection_dim
# clip token states = cat(32, 64) = 96, zero-padded on the feature axis to T5 width 128 = joint_attention_dim.
SD3_CLIP_L_CONFIG = dict(
    hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2
)
SD3_CLIP_G_CONFIG = dict(
    hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2, num_attention_heads=4
)
SD3_T5_CONFIG = dict(
    d_model=128,
    d_kv=16,
    d_ff=64,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",  # T5 v1.1 / T5-XXL style, as SD3 uses
    dense_act_fn="gelu_new",
    is_gated_act=True,
    dropout_rate=0.0,
)
SD3_TRANSFORMER_CONFIG = dict(
    sample_size=8,  # default image = 8 * vae_scale_factor(8) = 64 px
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,  # inner dim 32
    joint_attention_dim=128,  # = T5 d_model
    caption_projection_dim=32,  # must equal inner dim
    pooled_projection_dim=96,  # = CLIP-L proj 32 + CLIP-G proj 64
    pos_embed_max_size=16,  # up to 16 patches per side = 256 px
)
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # as SD3-Medium's scheduler_config.json
CLIP_MAX_LENGTH = 77
T5_WORDS = "a an the of and with on in at to is photo picture image painting drawing cat dog red blue green".split()


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in BYTE_CHARS:
        vocab[c] = len(vocab)
    for c in BYTE_CHARS:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # No merges: every (lower-cased) character is one token; enough for any prompt, at most 75 chars survive.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _clip_encoder(tok, cfg: dict, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok),
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,  # pooled output is read at the first eos token
        pad_token_id=tok.pad_token_id,
        **cfg,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    # Unigram vocab, T5 layout: <pad>=0, </s>=1, <unk>=2, then pieces. Word pieces + single characters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in T5_WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("▁" + c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5_encoder(tok, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        **SD3_T5_CONFIG,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def build_tiny_sd3(folder, seed: int = 0) -> Path:
    """Write a tiny random ``StableDiffusion3Pipeline`` to ``folder`` and return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = _folder(folder)
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, SD3_CLIP_L_CONFIG, seed + 1)
    text_encoder_2 = _clip_encoder(tokenizer_2, SD3_CLIP_G_CONFIG, seed + 2)
    text_encoder_3 = _t5_encoder(tokenizer_3, seed + 3)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG).eval()
    torch.manual_seed(seed + 5)
    vae = _vae(SD3_VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# LongCat-Image
# --------------------------------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5-VL chat template (text part; images/videos rendered as the vision placeholder tokens).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LONGCAT_TEXT_CONFIG = dict(
    hidden_size=32,  # = transformer.joint_attention_dim
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 16
    num_key_value_heads=1,
    max_position_embeddings=16384,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},  # sum = head_dim/2
)
LONGCAT_VISION_CONFIG = dict(
    depth=1,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    out_hidden_size=32,  # = text hidden size
    fullatt_block_indexes=[0],
)
LONGCAT_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels * 2x2 packing
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,  # inner dim 32
    joint_attention_dim=32,  # = Qwen hidden size
    pooled_projection_dim=32,  # unused by the model
    axes_dims_rope=[4, 6, 6],  # sum = attention_head_dim
)
# As FLUX-style schedulers; the LongCat pipeline always passes mu (see notes), so use_dynamic_shifting only
# decides whether that mu is used (True) or the static `shift` (False).
LONGCAT_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(BYTE_CHARS)}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tok.add_tokens([t for t in QWEN_SPECIAL_TOKENS if t not in tok.get_vocab()], special_tokens=True)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def _qwen_processor(tok):
    """The ``text_processor`` slot. Only ``rewire_prompt`` (``enable_prompt_rewrite=True``) uses it, and only for
    ``apply_chat_template(..., tokenize=False)``, ``__call__(text=..., padding=True, return_tensors="pt")`` and
    ``batch_decode`` -- all of which a ``Qwen2Tokenizer`` with the chat template provides. A real
    ``Qwen2VLProcessor`` cannot be built in an environment without torchvision (transformers 5.24 resolves the
    ``VideoProcessorMixin`` base class through the top-level module, where it only exists with torchvision), so the
    fixture stores the tokenizer here; diffusers logs an "Expected types for text_processor" warning on load."""
    return tok


def _qwen_encoder(tok, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    text = dict(
        LONGCAT_TEXT_CONFIG,
        vocab_size=len(tok),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=LONGCAT_VISION_CONFIG,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, text[key])
    return model


def build_tiny_longcat(folder, seed: int = 0) -> Path:
    """Write a tiny random ``LongCatImagePipeline`` to ``folder`` and return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    folder = _folder(folder)
    tokenizer = _qwen_tokenizer()
    text_processor = _qwen_processor(_qwen_tokenizer())
    text_encoder = _qwen_encoder(tokenizer, seed + 1)
    torch.manual_seed(seed + 2)
    transformer = LongCatImageTransformer2DModel(**LONGCAT_TRANSFORMER_CONFIG).eval()
    torch.manual_seed(seed + 3)
    vae = _vae(LONGCAT_VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**LONGCAT_SCHEDULER_CONFIG)
    pipe = LongCatImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_processor=text_processor,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def folder_size(folder) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


if __name__ == "__main__":  # python tests/tiny_pipelines.py OUT_DIR
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_pipelines")
    for name, build in (("sd3", build_tiny_sd3), ("longcat", build_tiny_longcat)):
        path = build(out / name)
        print(name, path, folder_size(path), json.dumps(sorted(p.name for p in path.iterdir())))
