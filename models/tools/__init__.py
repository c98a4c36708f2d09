"""The applications built on the library: the command line and what it runs (predict,
evaluate, benchmark). They import the library; the library never imports them."""
