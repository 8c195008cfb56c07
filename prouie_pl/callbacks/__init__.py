"""Lightning callbacks: curriculum advance, generation-based validation F1, adapter checkpoints."""
