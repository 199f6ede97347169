"""Browser tests: the node's results as a real viewer (OHIF, in headless chromium) shows them."""
