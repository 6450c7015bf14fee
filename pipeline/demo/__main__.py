from pipeline.demo.checkpoint import main

main()
