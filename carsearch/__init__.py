"""carsearch: detect-then-embed car image retrieval."""
