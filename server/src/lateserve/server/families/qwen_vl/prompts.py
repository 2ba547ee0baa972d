"""Raw (vLLM) prompts of the Qwen-VL late-interaction models, and the image-pad expansion.

vLLM builds a multimodal score/rerank item as one placeholder per image, all of them first, then the
text parts joined by "\\n" (`_parse_score_content`, vllm-spec 3.2.4):

    "<|vision_start|><|image_pad|><|vision_end|>" * n_images + "\\n".join(texts)

and the Qwen3-VL processor then repeats each `<|image_pad|>` as many times as the image has merged
patches. A chat (`/pooling` with `messages`) gets its placeholders from the chat template, one
`<|image_pad|>` per image in order, expanded the same way. No query prefix, no instruction, no
`<|endoftext|>` augmentation: that is the models' own (faithful) prompt, which vLLM does not build.
"""

from __future__ import annotations

from collections.abc import Sequence

from lateserve.server.domain import ImagePart, InvalidArgument, Part, TextPart

VISION_START = "<|vision_start|>"
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
"""What vLLM writes per image for Qwen3-VL and Qwen3.5 before the processor expands the pad."""


def raw_prompt(parts: Sequence[Part]) -> tuple[str, list[tuple[int, ImagePart]]]:
    """(prompt text with one unexpanded placeholder per image, [(part index, image part)] in order)."""
    images = [(k, p) for k, p in enumerate(parts) if isinstance(p, ImagePart)]
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    return IMAGE_PLACEHOLDER * len(images) + "\n".join(texts), images


def expand_image_pads(ids: Sequence[int], image_pad_id: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """`ids` with its k-th `<|image_pad|>` repeated counts[k] times, and where each run starts.

    The ids must hold exactly one pad per image: a text that spells `<|image_pad|>` itself, or a chat
    template that writes a different number of placeholders than there are images, is an InvalidArgument
    (the vision features would land on the wrong tokens).
    """
    pads = sum(1 for i in ids if i == image_pad_id)
    if pads != len(counts):
        raise InvalidArgument(
            f"the prompt holds {pads} {IMAGE_PAD} placeholder(s) for {len(counts)} image(s); "
            f"text may not contain {IMAGE_PAD}"
        )
    out: list[int] = []
    offsets: list[int] = []
    k = 0
    for token in ids:
        if token == image_pad_id:
            offsets.append(len(out))
            out.extend([image_pad_id] * counts[k])
            k += 1
        else:
            out.append(token)
    return out, offsets
