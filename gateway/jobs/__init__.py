"""The job model, pure data and functions (no I/O): outbound jobs' and received faxes' states,
events and transitions."""
