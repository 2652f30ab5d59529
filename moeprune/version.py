__version__ = "0.1.0"

# Artefact format versions: a reader accepts its own version and older ones.
PROFILE_FORMAT = 1
PATTERN_FORMAT = 1
