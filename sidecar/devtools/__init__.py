"""Development helpers that are not part of the product (echo upstream for Envoy e2e runs)."""
