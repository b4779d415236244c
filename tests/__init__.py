"""posttrain's test suite: a package, so that `tests.*` never resolves to a stray `tests` package that another
distribution (verl) installs into site-packages."""
