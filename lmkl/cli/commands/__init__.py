"""One module per CLI command; each exposes ``register(app)``. Commands stay thin: parse options,
call one library function, render its result. Heavy imports happen inside command bodies."""
