"""Tokenizer surgery (`fastmerge tokensurgeon`, mergekit-tokensurgeon's counterpart): a model
given a donor model's tokenizer.

vocabulary.py normalizes tokens so two tokenizers' vocabularies can be compared; matching.py
decides which output rows are copied from the model (exact, byte and prefix matches);
approximate.py makes the rest (omp, common_interpolation, mean, zero, subword, john_hewitt,
randn, through affine.py landmark_pca and stb, and through rope.py mp_rope; moments.py gives
them fp64 means and covariances a chunk of rows at a time); magikarp.py finds
the under-trained tokens --magikarp leaves out; transplant.py reads the models, rebuilds the
token-indexed tensors and writes the output.
"""

from .transplant import SurgeryReport, tokensurgeon

__all__ = ["SurgeryReport", "tokensurgeon"]
