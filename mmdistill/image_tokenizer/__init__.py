"""Discrete image tokenizers for text-to-image generation (OmniMamba-style).

The tokenizer is LlamaGen's VQ model (:mod:`.vq`): a convolutional encoder maps an image to a
grid of vectors, each snapped to the nearest entry of an L2-normalised codebook, and a decoder
maps the grid of codes back to pixels. LlamaGen's **VQ-16** (:data:`LLAMAGEN_VQ16`) has a
16384 x 8 codebook and downsamples by 16: a 256-pixel image becomes 16 x 16 = 256 codes, the
tokens an autoregressive model generates. Parameter names are LlamaGen's, so its checkpoints
load as they are (:mod:`.loading`).

* :mod:`.vq` -- :class:`VQConfig`, :data:`LLAMAGEN_VQ16`, :class:`VQModel` (``encode``,
  ``decode``, ``quantize``, and ``forward`` for training);
* :mod:`.pixels` -- PIL images <-> tensors in [-1, 1], palette agreement for flat colours;
* :mod:`.loading` -- :class:`ImageTokenizer` (PIL in and out, ``digest``, ``save``) and
  :func:`load_image_tokenizer` (``builtin:shapes-vq``, ``builtin:shapes-vq-patch``, saved
  directories, LlamaGen checkpoints; strict).

Typical use::

    tok = load_image_tokenizer("builtin:shapes-vq")        # 64 px -> 8 x 8 codes
    codes = tok.encode_images(images)                       # LongTensor [n, 8, 8]
    pictures = tok.decode_images(codes)                     # list of PIL images

    vq16 = load_image_tokenizer("pretrained_models/vq_ds16_c2i.pt")   # LlamaGen VQ-16
"""

from .loading import (
    BUILTIN_IMAGE_TOKENIZERS,
    ImageTokenizer,
    check_state_dict,
    load_image_tokenizer,
    read_checkpoint_file,
)
from .pixels import (
    images_to_tensor,
    palette_agreement,
    palette_indices,
    tensor_to_images,
    tensor_to_uint8,
)
from .vq import LLAMAGEN_VQ16, VQConfig, VQModel

__all__ = [
    "BUILTIN_IMAGE_TOKENIZERS",
    "LLAMAGEN_VQ16",
    "ImageTokenizer",
    "VQConfig",
    "VQModel",
    "check_state_dict",
    "images_to_tensor",
    "load_image_tokenizer",
    "palette_agreement",
    "palette_indices",
    "read_checkpoint_file",
    "tensor_to_images",
    "tensor_to_uint8",
]
