"""workers/collectors"""
