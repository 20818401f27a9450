"""Training, evaluation and explanation of the pneumonia model (imports TensorFlow lazily)."""
