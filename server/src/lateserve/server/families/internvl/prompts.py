"""The `<image>` placeholder of the Llama-Nemotron-VL prompts and its expansion into image tokens.

NVIDIA's processor (and vLLM's `LlamaNemotronVLEmbedProcessor`) replaces each `<image>` in the prompt text,
in order, by `<img>` + `<IMG_CONTEXT>` x (tiles x tokens per tile) + `</img>` and then tokenizes the text.
`<img>`, `</img>` and `<IMG_CONTEXT>` are added tokens, which the tokenizer splits out before it normalises
or pre-tokenizes anything, so tokenizing the text with ONE `<IMG_CONTEXT>` per image and repeating that id
gives the same ids without building a string of thousands of tokens.

Prompts, as vLLM builds them:

* a multimodal score/rerank/pooling item (vllm-spec 3.2.4): `"<image>" * n_images + "\\n".join(texts)`;
* a chat: whatever the template writes (`nemotron_embed_vl.jinja`: `bos + prefix + "<image> " * n + texts`);
* a cross-encoder pair: the score template's text (`nemotron-vl-rerank.jinja` hoists one `<image> ` to
  the front when the document has one), or NVIDIA's own `prompt_template` when none is configured.
"""

from __future__ import annotations

from collections.abc import Sequence

from lateserve.server.domain import ImagePart, InvalidArgument, Part, TextPart

IMAGE = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
COMPACT = IMG_START + IMG_CONTEXT + IMG_END
"""One image as tokenized here: its single context token is repeated afterwards (`expand_context`)."""


def raw_prompt(parts: Sequence[Part]) -> tuple[str, list[tuple[int, ImagePart]]]:
    """(vLLM's prompt text with one `<image>` per image, all first; [(part index, image part)] in order)."""
    images = [(k, p) for k, p in enumerate(parts) if isinstance(p, ImagePart)]
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    return IMAGE * len(images) + "\n".join(texts), images


def compact_placeholders(text: str, n_images: int) -> str:
    """`text` with its first `n_images` `<image>` placeholders replaced by `<img><IMG_CONTEXT></img>`, as the
    processor replaces them one image at a time; later `<image>` strings stay text. Fewer placeholders than
    images is an InvalidArgument."""
    found = text.count(IMAGE)
    if found < n_images:
        raise InvalidArgument(f"the prompt holds {found} {IMAGE} placeholder(s) for {n_images} image(s)")
    return text.replace(IMAGE, COMPACT, n_images)


def expand_context(ids: Sequence[int], context_id: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """`ids` with its k-th `<IMG_CONTEXT>` repeated counts[k] times, and where each run starts. Exactly one
    context token per image is required: text that spells `<IMG_CONTEXT>` itself is refused (the image
    features would land on the wrong tokens)."""
    found = sum(1 for i in ids if i == context_id)
    if found != len(counts):
        raise InvalidArgument(
            f"the prompt holds {found} {IMG_CONTEXT} token(s) for {len(counts)} image(s); "
            f"text may not contain {IMG_CONTEXT}"
        )
    out: list[int] = []
    offsets: list[int] = []
    k = 0
    for token in ids:
        if token == context_id:
            offsets.append(len(out))
            out.extend([context_id] * counts[k])
            k += 1
        else:
            out.append(token)
    return out, offsets
