"""The model layer: where a checkpoint comes from (source.py), the named shapes sweep can write with random weights
(shapes.py) and their writer (random_weights.py), and what a shape costs in bytes.

Light to import: `from sweep.model import SHAPES` loads no torch.
"""

from sweep.model.shapes import SHAPES, Shape, random_model_name

__all__ = ["SHAPES", "Shape", "random_model_name"]
