from pipeline.convert.onnx_dir import main

main()
