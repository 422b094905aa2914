"""Small shared building blocks: cameras, rotations, device selection."""
