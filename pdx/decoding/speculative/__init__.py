"""Speculative decoding: draft up to K tokens, verify K+1 in one target pass, never change the output."""
