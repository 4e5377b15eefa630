"""Ray Serve deployment of distilled students (arrives with the serving issue)."""
