"""denselm: decoder-only LLMs as dense retrievers. Train, encode, search, evaluate."""

from .model.encoder import BiEncoderModel, EncoderOutput

__all__ = ["BiEncoderModel", "EncoderOutput"]
__version__ = "0.1.0"
