"""Generation: options, sampling, stopping and the step loop."""
