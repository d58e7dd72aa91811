"""The MMTalker platform: Ray Data, Ray Train, MLflow, batch animation, serving and the CLI."""
