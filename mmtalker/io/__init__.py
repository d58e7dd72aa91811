"""Reading and writing what users see: exports (npz, glTF, OBJ), rendered stills and videos."""
