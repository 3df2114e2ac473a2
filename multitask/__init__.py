"""multitask: one InceptionV3 backbone, two heads (organ, benign/malignant) for medical images.

Importing the package is cheap (no TensorFlow); the modules that need it import it themselves.
"""

__version__ = "0.1.0"
