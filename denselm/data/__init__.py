"""Data: formats (schema, readers), sampling (groups, same-dataset batches), templates, collate."""
