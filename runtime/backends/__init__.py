"""Execution backends (torch, tensorrt), chosen per component in the profile."""
