"""The publish stage: the Hugging Face Hub upload and the model card."""
