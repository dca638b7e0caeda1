"""Real and simulated arms behind the Robot interface, over the rosbridge protocol.

    robots.base        Robot: connect / get_observation / send_action / disconnect
    robots.safety      SafetyConfig, SafetyLayer (workspace, clamps, velocity, watchdog, e-stop, arming)
    robots.ros_robot   RosBridgeRobot: roslibpy client for MoveIt Servo twists + gripper
    robots.sim_server  python -m robots.sim_server: a suite task served over rosbridge v2
    robots.messages    rosbridge JSON <-> ROS messages, strict parsers
    robots.rosbridge   protocol checks, fragments, png compression
"""
