"""One task per model family; the loop is given one of these and knows nothing else about the family."""
