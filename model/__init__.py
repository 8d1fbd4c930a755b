"""yworld.model: the YOLO-World network, its training objective and weight loading."""
