"""Names shared by the model and the configuration, importable without Keras or TensorFlow
(flags are checked before the heavy imports)."""

DEPTHS = (18, 34, 50, 101, 152)
VARIANTS = ("v1.5", "v1")
