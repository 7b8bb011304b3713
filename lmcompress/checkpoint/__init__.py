"""Model files: the output folder (recipe, markers, atomic writes), the one loader, saving dense and packed
folders, the packed layouts, inspecting a folder, and exports for serving engines."""
