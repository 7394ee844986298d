"""Image files: finding them, their headers and content hashes (the scan and its stat cache), and decoding them."""
