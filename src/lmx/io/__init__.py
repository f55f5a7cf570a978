"""Model file formats: Hugging Face safetensors directories and GGUF files."""
