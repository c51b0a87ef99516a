"""Isolation backends shipped with polyshim; third-party ones register through entry points."""
