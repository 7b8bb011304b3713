"""Model files: the output folder (recipe, markers, atomic writes), the one loader, saving dense and packed
folders, the packed layouts, inspecting a folder, exports for serving engines, and the demo's reference model
(fetched and converted once)."""
