from fleet_controller.cli import main

main()
