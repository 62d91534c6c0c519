//! quiver bench fabric (being written)
