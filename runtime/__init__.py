"""Loading generated code, allocating, launching, and the autograd glue."""
