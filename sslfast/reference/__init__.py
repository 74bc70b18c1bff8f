"""Reference implementations: pure PyTorch, vectorised, device-agnostic. They are the
specification every kernel is tested against and the fallback backend ``"reference"``."""
