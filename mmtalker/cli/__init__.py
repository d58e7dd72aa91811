"""The model library's commands (data, train, evaluate, render), composed by the platform."""
