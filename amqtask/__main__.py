from amqtask._cli import main

main()
