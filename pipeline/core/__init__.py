"""The base layer every other part imports: errors, atomic writes, .npy and JSON reading, the file contract."""
