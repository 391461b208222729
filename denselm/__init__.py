"""denselm: decoder-only LLMs as dense retrievers. Train, encode, search, evaluate.

    import denselm
    enc = denselm.load("out/model")      # = denselm.load_encoder
    scores = enc.similarity(enc.encode_queries(["..."]), enc.encode_corpus(["..."]))
"""

from .inference import Encoder, load_encoder
from .model.encoder import BiEncoderModel, EncoderOutput
from .spec import EmbeddingSpec

load = load_encoder
"""Short alias of ``load_encoder``."""

__all__ = ["BiEncoderModel", "EmbeddingSpec", "Encoder", "EncoderOutput", "load", "load_encoder"]
__version__ = "0.1.0"
